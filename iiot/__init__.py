"""The `iiot` command and what composes the packages into running processes."""
