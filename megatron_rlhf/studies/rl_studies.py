"""The RL studies (placeholder list until they are added)."""

STUDIES = ()
