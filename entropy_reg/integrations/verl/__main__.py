"""``python -m entropy_reg.integrations.verl <verl overrides> +aer.<field>=...``: verl's PPO trainer with AER."""

from . import main

if __name__ == "__main__":
    main()
