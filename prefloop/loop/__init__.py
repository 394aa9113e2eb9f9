"""The online loop: scheduled rounds, hot-swap, duels, promotion and rollback, ratings."""
