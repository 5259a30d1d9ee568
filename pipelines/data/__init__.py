"""The data stages: url lists from the public datasets' metadata (sources), img2dataset downloads into webdataset
shards (download), the synthetic shapes world, the training ingest on Ray Data, and a loopback file server."""
