"""The ingest stage: serial ports -> framed lines -> parsed readings -> stamped points for the store.

framing (bytes -> lines), links (opening and reading a port), source (the reopen loop), parsers (one module
per line format), mcu_clock (ms= -> wall time), pipeline (line -> points: the only builder of the parse context).
Nothing is re-exported here, so that config can use the parsers' key rules without importing the pipeline.
"""
