"""Technician review: a local web page to verify and reclassify cells, sign-off, signed reports, exports, FHIR.

* ``server``: the review page's HTTP server (standard library only; static page in ``static/``);
* ``verified``: the differential recounted from the verified classes (with ``edge/count``'s code);
* ``export_cells``: verified cells as class folders for ``hemaedge adapt`` and ``export-model --calib``;
* ``fhir`` / ``outbox``: the results as a FHIR R4 Bundle and a store-and-forward queue that posts it.

The audit trail itself lives in the session store (``hemaedge.edge.store.review``).
"""
