"""What a job will run, decided before Ray starts: table specs (``specs``, ``specs/*.yaml``), the cells they expand
to (``experiments``), and the data checks that refuse bad input first (``datacheck``)."""
