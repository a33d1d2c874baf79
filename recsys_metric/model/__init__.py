"""The two-tower metric model: distances, towers and losses."""
