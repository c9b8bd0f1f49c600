"""De-identification: the PS3.15 Annex E table (data), the engine, the verification gate."""
