"""The service's database: requests, audit, API keys, outcomes, live performance.

Names the command line offers live here, importable without SQLAlchemy.
"""

# API key scopes: predict (clients), feedback (record outcomes, read live performance),
# admin (everything, the audit trail too).
SCOPES = ("predict", "feedback", "admin")
