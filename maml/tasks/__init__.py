"""Task families: objects whose one job is sampling episodes on the device.

A task family has ``sample(key, num_tasks) -> {"support": (x, y), "query": (x, y), ...}``
(every leaf with a leading task axis), ``loss(predictions, targets)``,
``metrics(predictions, targets) -> dict`` and the name of its evaluation
``metric``.
"""
