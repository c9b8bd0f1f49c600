"""Review (SPEC §9): every tag of a project's de-identified output with its distinct values,
read from the project's destination: the files of a folder, or a cached sample of each
series' headers at the research PACS. See `source.open_source`."""
