"""Applications: for a new project, or for a role on an existing one (SPEC §9)."""
