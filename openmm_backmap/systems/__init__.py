"""Built-in molecular systems: peptide builder and reference MD data generation."""
