"""Who may use the mirror: client networks, docxy's own users and their tokens, rate limits,
and the one policy object the resources ask."""
