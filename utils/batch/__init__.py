"""Captioning a dataset, in one process or on a Ray cluster (scripts/batch_infer.py is the front end).

    inputs.py    what --images names (folders, files, URLs, lists, webdataset shards, parquet) and its rows
    outputs.py   the result rows, JSON lines or parquet, and the bookkeeping that gives every input exactly
                 one row however often a run is killed and started again
    captioner.py every query about each image, answered on the serving engine (utils/engine.py)
    ray_job.py   the same on Ray Data: an actor pool of model replicas, results written by the driver
"""

LOCAL = "local"  # --ray alone: the cluster `ray start` runs on this machine, else a new local one
