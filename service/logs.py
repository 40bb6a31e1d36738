"""What the service and the PACS gateway let into their logs: nothing that identifies a
patient or a study (docs/integration.md).

Our own lines name instances by a hash and requests by their id. Third-party libraries
do not know that rule, so they are held back here, whatever level the process logs at:
- highdicom logs `copy Patient-related attributes from dataset "<SOPInstanceUID>"` at
  INFO and warns with the patient's name when it is not a well-formed PN;
- pydicom warns (as a warning and a log line) quoting the header value it found odd: a
  birth date, a name;
- dicomweb-client logs each request with its study and series UIDs in the URL, and so
  does urllib3 (under dicomweb-client and requests) at DEBUG, and in its retry warnings;
- uvicorn's access log prints each request line with its query string.
These four are held to ERROR (their warnings quote values), their Python warnings
are ignored, and the access log loses its query strings.
"""

from __future__ import annotations

import logging
import warnings

HELD = ("highdicom", "pydicom", "dicomweb_client", "urllib3")
ACCESS = "uvicorn.access"


class _NoQueryString(logging.Filter):
    """uvicorn's access record is `'%s - "%s %s HTTP/%s" %d'` with the full path third."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def hold_third_party() -> None:
    """Apply the policy above (idempotent: call it wherever a process starts serving)."""
    for name in HELD:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(highdicom|pydicom)(\.|$)")
    access = logging.getLogger(ACCESS)
    if not any(isinstance(f, _NoQueryString) for f in access.filters):
        access.addFilter(_NoQueryString())
