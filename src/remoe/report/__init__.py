"""Report stage: run directories -> paper-style tables and figures (reads files only, never live objects).

build.build_report is the entry; collect reads run folders, tables and claims compute, figures draw, stats holds
the rules every claim follows."""
