"""The scanner side (SPEC §10): the MPPS SCP that learns which scans run (`mpps`), the durable
record of steps and scans (`steps`), and the job that pulls what the scanner has and FIONA lacks
(`pull`)."""
