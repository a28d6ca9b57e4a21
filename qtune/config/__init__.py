"""The recipe: its schema and sections, reading and validating it (recipe), a finished run as later stages read it
(runs), and the recipe reference generated from the schema's field docs (reference)."""
