"""`unitok serve`: an OpenAI-compatible server (api), one continuous-batching engine (engine) and a web page."""
