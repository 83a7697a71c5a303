"""The history service: conversations, items and stored responses over SQL."""
