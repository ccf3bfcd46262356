"""wildreid service: the FastAPI app over a store of individuals.

    app.py        the app factory and error handlers      routers/   one router per resource
    settings.py   every setting, one pydantic model       schemas.py requests and responses
    models.py     the re-ID model of each species, the detector, the species classifier
    pipeline.py   photos -> animals (boxes, detections, crops), as identify-batch finds them
    core.py       the request flows: find, classify, embed, search, enroll
    store.py      the database (SQLite or PostgreSQL): the truth
    gallery.py    per-species FAISS galleries kept in step with the database
    batching.py   micro-batched model inference off the event loop
"""
