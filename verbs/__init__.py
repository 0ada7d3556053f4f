"""What the verbs beyond train and val do, a module each: predict (test and predict), runs, export,
serve, sweep, kfold. main.py parses the options and calls them; none of them imports another."""
