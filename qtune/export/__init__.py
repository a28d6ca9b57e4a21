"""`qtune export`: the formats (formats/, THE registry of them, their writers and loaders) and the command that
writes the requested ones and measures each against the trained model (run)."""
