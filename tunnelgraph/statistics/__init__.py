"""A-statistics: measured gradient statistics of every site, its steepest lambda, and site ranking."""
