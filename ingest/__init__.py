"""Stage 1: cells and metadata from the CELLxGENE Census (or a local SOMA store) and ontology terms."""
