"""Generated Python stubs of the specserve wire contract (see proto/)."""
