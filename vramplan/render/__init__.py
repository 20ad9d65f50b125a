"""render: results become rich tables and plots here, and nowhere else. report.py turns an
estimate into rows; tables.py and profile_tables.py print them; plots.py and profile_plots.py
draw them (matplotlib, imported on use)."""
