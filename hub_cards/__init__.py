"""Model-card templates (Jinja) rendered by `diffusers_erase.hub`; installed as `diffusers_erase.hub_cards`."""
