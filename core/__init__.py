"""The bottom layer: config, the bus protocol, files, keys and other pieces both sides share.
Imports nothing else of Virby."""
