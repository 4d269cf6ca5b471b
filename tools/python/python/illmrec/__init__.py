"""illmrec: the I-LLMRec runtime from Python.

    >>> import illmrec
    >>> rec = illmrec.Recommender("models/demo-bundle", threads=2)
    >>> ids, scores = rec.recommend([260, 1198, 1196], top_k=5)
    >>> rec.score_batch([{"user": 1, "history": [260, 1198]}])
    [{'history_used': [260, 1198], 'items': [{'rank': 1, 'id': ..., 'score': ..., 'title': ..., 'year': ..., 'genres': [...]}, ...], 'user': 1}]
    >>> rec.embed([[260, 1198], [589]]).shape
    (2, 640)

The model runs with the GIL released; one Recommender serves one call at a time (concurrent
calls wait), so use one per thread or process for parallelism. Errors of the runtime raise
IllmrecError with its message.
"""

from ._illmrec import IllmrecError, Recommender, __version__

__all__ = ["IllmrecError", "Recommender", "__version__"]
