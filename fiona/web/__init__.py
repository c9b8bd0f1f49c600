"""The web application (SPEC §9): Assign, Review, Status behind login, with an audit trail."""
