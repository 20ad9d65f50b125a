"""render: results become rich tables and plots here, and nowhere else. _report.py turns an
estimate into rows; _tables.py and _profile_tables.py print them; _plots.py and _profile_plots.py
draw them (matplotlib, imported on use)."""
