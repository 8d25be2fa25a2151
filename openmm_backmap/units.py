"""The thermal energy, defined once: kT in kJ/mol for a temperature in kelvin.

Inside the package positions are nm, energies kJ/mol, reduced energies u = U / kT dimensionless and
log densities nats; this module holds the one constant that links energies and temperatures.
"""

from __future__ import annotations

MOLAR_GAS_CONSTANT = 8.314462618e-3  # kJ / (mol K): R = N_A k_B, CODATA 2018 to ten digits


def kT(temperature: float) -> float:
    """Thermal energy in kJ/mol at ``temperature`` kelvin."""
    return MOLAR_GAS_CONSTANT * float(temperature)
