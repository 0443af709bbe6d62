"""flexcomp inside other frameworks.  Each integration is imported explicitly (`import
flexcomp.integrations.transformers`), so `import flexcomp` never imports the framework."""
