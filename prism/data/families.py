"""The embedded world's task families, in one light module: the CLI's parser and the evaluation config need the
names without the world generator's numpy and PIL (a refused argument returns in a fraction of a second)."""

FAMILIES = ("counting", "presence", "chart", "geometry", "composite", "multichoice")
