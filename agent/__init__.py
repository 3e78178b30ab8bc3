"""The node agent: harvest flows from the datapath, compute features, enrich, export."""
