"""The rule engine: channel groups, legal clone sites and why other places are not sites."""
