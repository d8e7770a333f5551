"""Evaluation: the reports that score a run's vectors, each a stage over a keyword-only config that writes
`reports/NAME/` — `retrieval` (leave-one-out on one label per image, `cbir evaluate`), `objects`
(multi-object scenes judged by their object sets, `cbir evaluate-objects`), `text` (words → images,
`cbir evaluate-text`), `methods` (NN, kNN vote and FAISS indexes on the same vectors, `cbir compare-methods`)
and `trained` (each trained set against its source, inside the retrieval report). The metrics themselves
live in `cbir.metrics`; a new report is one new module here.
"""
