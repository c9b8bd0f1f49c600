"""Forwarding de-identified studies: the destinations they go to (`destinations`: a folder, a
DICOM peer such as the research PACS) and, later, the sender daemon and delivery verification.

A destination is found by its name in config.json's DESTINATIONS through
`destinations.open_destination`; each kind is one handler class with `send`,
`count_instances` (for verifying arrival) and `test_connection`.
"""
