"""The platform on Ray, built on ``pgseg``. Orchestrators: ``flow`` (workflows: ``pgseg run``) and ``tune`` (sweeps).
Stages: ``data`` (sources, download, shapes world, ingest), ``train`` (Ray Train), ``evaluate`` (Ray Data).
Services below them: ``runtime`` (Ray start/attach, loopback, resources), ``tracking`` (every MLflow call),
``digest`` (content hashes), ``rendezvous`` and ``ray_private`` (the adapters to Ray's private API).
Nothing here imports ``jobs``."""
