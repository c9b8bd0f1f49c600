"""Attach: data that does not come over DICOM (SPEC §9), for users with an assign role.

DICOM from media (a zip or folder, with or without DICOMDIR), whole-slide images converted by
wsidicomizer, and documents (PDF, PNG, JPEG) as a new series of an existing study all end as
Part-10 objects that go through the receiver's own filing (`fiona.receive.store`), so the
indexer, the arrival daemon, de-identification, the gate and forwarding treat them as received
studies. The study is tied to (project, participant, event) by a coupling row keyed by its
StudyInstanceUID, which the arrival daemon applies once the study has arrived.

Modules: `kinds` (what a file is, by content and name), `archive` (safe zip extraction),
`media` (Part-10 objects of a folder), `wsi` (conversion), `documents` (PDF and images),
`ingest` (filing and the coupling row), `jobs` (the durable job folders, uploads included),
`service` (who may, and one job run), `worker` (the web's job thread), `cli`.
"""
