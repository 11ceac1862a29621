"""Statistics, tables, sequential designs, reports and plots over stored runs."""
