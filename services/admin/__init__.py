"""The admin plane: tiers, tenants and API keys in the mesh's database, served to admins and read live by every
gateway and rate-limit replica."""
