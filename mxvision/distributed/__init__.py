"""One feature, data-parallel extraction and head training on MXNet's parameter server (command ``mxvision cluster``):

``kvstore`` shards extraction, ``train`` trains the head with ``dist_sync``, ``cluster`` starts the jobs.
"""
