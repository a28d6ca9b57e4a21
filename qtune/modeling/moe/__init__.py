"""Mixtures of experts in 4 bits: each family's fused experts (transformers 5 keeps them as 3-D parameters, which
bitsandbytes leaves in 16 bits) split into one NF4 layer per expert projection, routed so that only the chosen
experts compute. families.py is the registry (one entry per model type, light to import: `qtune validate` reads it);
experts.py the module that replaces a family's experts; streaming.py quantizes them while they load; saved.py reads
them back from a model saved in 4 bits."""
