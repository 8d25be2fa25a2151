"""Built-in systems, their reference MD, restraints and umbrella sampling."""
