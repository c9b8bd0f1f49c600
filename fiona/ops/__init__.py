"""Operations: the periodic jobs that keep a gateway's disk in order, and backup/restore."""
