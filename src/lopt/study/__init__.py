"""The study: `lopt demo` trains and evaluates named variants side by side; its report, plots and variants."""
