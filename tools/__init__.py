"""Developer tools: tools/mutants.py checks that the suite catches broken rules."""
