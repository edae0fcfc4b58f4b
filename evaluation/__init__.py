"""Evaluation: how well a bundle and the station do on labelled data (``hemaedge evaluate``).

* ``metrics`` - classification metrics from probabilities (numpy only).
* ``labelled`` - readers of labelled station data: single-cell class folders, BCCD-style frames (VOC boxes plus a
  type per frame), and frames listed in a ``labels.csv``.
* ``station`` - the station path on labelled data: segment, crop with the bundle's geometry at session scale,
  classify, score against the labels (classes matched by name, spelling, ``--map`` or clinical group).
* ``command`` - ``hemaedge evaluate``.

No torch here: a station runs ``hemaedge evaluate --station`` to validate itself on its own cells.
"""
