"""Forwarding de-identified studies: the forwarder daemon (`forward`, de-identifying through
`fiona.deid.pipeline`) and the destinations it delivers to (`destinations`: a folder, a DICOM
peer such as the research PACS).

A destination is found by its name in config.json's DESTINATIONS through
`destinations.open_destination`; each kind is one module with a typed settings class and a
handler class with `send`, `count_instances` (for verifying arrival) and `test_connection`.
"""
