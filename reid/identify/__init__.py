"""The identification core, under both `reid serve` and `reid identify-batch`.

The data flows through it in the order of its modules:

    photos.py     photo bytes -> decoded RGB arrays, within pixel and memory limits
    animals.py    photos + boxes or detections -> animals (each a list of views, cut alike)
                  (species: reid.species; which model serves a species: reid.species.routing)
    reembed.py    stored images -> model inputs again, when another model embedded them
    gallery.py    store rows -> per-species galleries kept in step with the store's change feed,
                  searched by cosine and re-ranked (k-reciprocal, alpha-QE); candidates are individuals
    decision.py   thresholds (route, checkpoint calibration, defaults) and the match / uncertain / new decision
    identify.py   one animal's views embedded -> its candidates and decision

The store itself (database and image files) is reid.store.
"""
